#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#define BLK 4096
#define CHUNK (8<<20)
#define PIECE (256<<10)
static int zero(const uint8_t *p){const uint64_t*w=(const uint64_t*)p;for(int i=0;i<BLK/8;i+=8)if(w[i]|w[i+1]|w[i+2]|w[i+3]|w[i+4]|w[i+5]|w[i+6]|w[i+7])return 0;return 1;}
static void wr(int o,const uint8_t*p,size_t n,off_t pos){while(n){size_t k=n<PIECE?n:PIECE;ssize_t w=pwrite(o,p,k,pos);if(w<=0){perror("pwrite");exit(1);}p+=w;n-=w;pos+=w;}}
static void cfr(int i,int o,off_t pos,size_t n){off_t a=pos,b=pos;while(n){ssize_t w=copy_file_range(i,&a,o,&b,n,0);if(w<=0){perror("cfr");exit(1);}n-=w;}}
int main(int c,char**v){int mode=atoi(v[1]);int in=open(v[2],O_RDONLY);int out=open(v[3],O_WRONLY|O_CREAT|O_TRUNC,0644);
 struct stat st;fstat(in,&st);ftruncate(out,st.st_size);uint8_t*buf=aligned_alloc(4096,CHUNK);
 off_t at=0;while(at<st.st_size){off_t d=lseek(in,at,SEEK_DATA);if(d<0)break;off_t h=lseek(in,d,SEEK_HOLE);
  for(off_t p=d;p<h;p+=CHUNK){size_t n=h-p<CHUNK?h-p:CHUNK;const uint8_t*m;
   if(mode==0){size_t g=0;while(g<n){ssize_t r=pread(in,buf+g,n-g,p+g);if(r<=0){perror("pread");exit(1);}g+=r;}m=buf;}
   else {m=mmap(NULL,n,PROT_READ,MAP_SHARED|(mode==2?MAP_POPULATE:0),in,p);if(m==MAP_FAILED){perror("mmap");exit(1);}}
   size_t run=(size_t)-1;for(size_t q=0;q<n;q+=BLK){if(zero(m+q)){if(run!=(size_t)-1){mode?cfr(in,out,p+run,q-run):wr(out,m+run,q-run,p+run);run=-1;}}else if(run==(size_t)-1)run=q;}
   if(run!=(size_t)-1)mode?cfr(in,out,p+run,n-run):wr(out,m+run,n-run,p+run);
   if(mode)munmap((void*)m,n);}
  at=h;}
 close(out);return 0;}
